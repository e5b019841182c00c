//! Two renderers of one result value: for a person, and as one JSON document.
//!
//! Owns presentation only: it draws the values the stages return (the plan with its checks, the
//! apply report, the status) and must not compute, fetch or read files.

use std::fmt::Write as _;

use serde::Serialize;

use crate::apply::{Report, Status};
use crate::checks::PlanReport;
use crate::plan::{ArtifactAction, LinkAction, PendingState, StageAction};

/// ANSI colour, only when the output is a terminal and NO_COLOR is unset.
#[derive(Debug, Clone, Copy)]
pub struct Colors(pub bool);

impl Colors {
    pub fn for_stdout() -> Self {
        use std::io::IsTerminal;
        Colors(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
    pub fn green(self, t: &str) -> String {
        self.paint("32", t)
    }
    pub fn yellow(self, t: &str) -> String {
        self.paint("33", t)
    }
    pub fn red(self, t: &str) -> String {
        self.paint("31", t)
    }
    pub fn dim(self, t: &str) -> String {
        self.paint("2", t)
    }
    pub fn bold(self, t: &str) -> String {
        self.paint("1", t)
    }
}

/// `cvx backup list` for a person: one line per backup, oldest first.
pub fn backups_human(backups: &[crate::run::rollback::Listed], c: Colors) -> String {
    let mut out = String::new();
    if backups.is_empty() {
        out.push_str(
            "no backups recorded (cvx run records each backup it takes before an upgrade)\n",
        );
        return out;
    }
    for b in backups {
        let r = &b.record;
        let state = match b.state {
            "ok" => c.green("ok"),
            other => c.red(other),
        };
        let when = crate::time::format_go(
            "2006-01-02 15:04:05Z07:00",
            std::time::UNIX_EPOCH + std::time::Duration::from_nanos(r.finished_at_ns.max(0) as u64),
        );
        let _ = writeln!(
            out,
            "{state} before {} (height {}), {when}, {}\n    {}\n    {} table files linked ({}), {} files copied ({}); previous stage {}",
            c.bold(&r.upgrade),
            r.height,
            r.took(),
            r.path.display(),
            r.files_linked,
            human_size(r.bytes_linked),
            r.files_copied,
            human_size(r.bytes_copied),
            r.from_stage,
        );
        if let Some(changed) = &b.changed {
            let _ = writeln!(
                out,
                "    {} changed after the backup: not restorable",
                changed.display()
            );
        }
    }
    out
}

/// `cvx history` for a person: one block per upgrade, oldest first.
pub fn history_human(entries: &[crate::run::history::Entry], c: Colors) -> String {
    let mut out = String::new();
    if entries.is_empty() {
        out.push_str("no upgrades recorded (cvx run records each upgrade it performs)\n");
        return out;
    }
    for e in entries {
        let result = match e.result.as_str() {
            "done" => c.green("done"),
            other => c.red(other),
        };
        let _ = writeln!(
            out,
            "{result} {} at height {} ({}), detected {}",
            c.bold(&e.upgrade),
            e.height,
            e.trigger,
            e.detected_at
        );
        match (&e.started_at, e.downtime_ms) {
            (Some(started), Some(ms)) => {
                let _ = writeln!(out, "    new binary started {started}: down {ms} ms");
            }
            _ => {
                let _ = writeln!(out, "    new binary not started by cvx");
            }
        }
        if let Some(backup) = &e.backup {
            let _ = writeln!(out, "    backup {}", backup.display());
        }
        if let Some(error) = &e.error {
            let _ = writeln!(out, "    error: {error}");
        }
    }
    out
}

/// `cvx rollback` for a person: what it did (or would do) and the command to restart.
pub fn rollback_human(r: &crate::run::rollback::Rollback, c: Colors) -> String {
    let mut out = String::new();
    let verb = if r.done {
        "rolled back"
    } else {
        "would roll back"
    };
    let _ = writeln!(
        out,
        "{} upgrade {} (height {})",
        c.bold(verb),
        r.upgrade,
        r.height
    );
    let _ = writeln!(out, "  data/      restored from {}", r.backup.display());
    match &r.data_kept_at {
        Some(kept) => {
            let _ = writeln!(
                out,
                "             the data/ it replaced is kept at {}",
                kept.display()
            );
        }
        None => {
            let _ = writeln!(
                out,
                "             the current data/ would be kept beside it (renamed, not deleted)"
            );
        }
    }
    let _ = writeln!(out, "  current    {} -> {}", r.current_from, r.current_to);
    let _ = writeln!(
        out,
        "\n{} the restored data/ still holds the plan for {}: restart the node with {} so it does not halt for it again:\n  {}\n(under systemd, add `{}` to ExecStart, then remove it once the chain has moved past height {})",
        if r.done {
            c.bold("next:")
        } else {
            c.bold("then:")
        },
        r.upgrade,
        r.skip_flag,
        r.restart,
        r.skip_flag,
        r.height
    );
    out
}

/// One JSON document, pretty-printed, newline-terminated.
pub fn json<T: Serialize>(value: &T) -> String {
    let mut out = serde_json::to_string_pretty(value).expect("plain data always serializes");
    out.push('\n');
    out
}

/// The plan for a person: grouped by stage, one line per action with its reason.
pub fn plan_human(report: &PlanReport, c: Colors) -> String {
    let plan = &report.plan;
    let mut out = String::new();
    let home = match &plan.home {
        Some(home) => home.display().to_string(),
        None => {
            "unknown (no --home, DAEMON_HOME or chain.home: planned against an empty tree)".into()
        }
    };
    let _ = writeln!(
        out,
        "{} {} ({}) on {}, home {}",
        c.bold("chain"),
        plan.chain,
        plan.daemon,
        plan.platform,
        home
    );
    for stage in &plan.upgrades {
        out.push('\n');
        let mut title = if stage.action == StageAction::Unmanaged {
            stage.dir.clone()
        } else if stage.dir == crate::tree::GENESIS {
            "genesis".to_string()
        } else {
            format!("upgrade {}", stage.name)
        };
        let mut details = Vec::new();
        if let Some(h) = stage.height {
            details.push(format!("height {h}"));
        }
        if let Some(v) = &stage.version {
            details.push(v.clone());
        }
        if let (Some(crate::manifest::Trigger::HaltHeight), Some(h)) = (stage.trigger, stage.height)
        {
            details.push(format!("scheduled: cvx run halts the node at {h}"));
        }
        if stage.dir != crate::tree::GENESIS && stage.action != StageAction::Unmanaged {
            details.push(stage.dir.clone());
        }
        if stage.current {
            details.push("current".into());
        }
        if !details.is_empty() {
            let _ = write!(title, " ({})", details.join(", "));
        }
        let action = match stage.action {
            StageAction::Create => c.green("create"),
            StageAction::Replace => c.yellow("replace"),
            StageAction::Adopt => c.green("adopt"),
            StageAction::Ok => c.dim("ok"),
            StageAction::Unmanaged => c.dim("unmanaged: on disk, not in the manifest; left alone"),
        };
        let _ = writeln!(out, "{}: {action}", c.bold(&title));
        let width = stage
            .artifacts
            .iter()
            .map(|a| a.destination.len() - stage.dir.len() - 1)
            .max()
            .unwrap_or(0);
        for a in &stage.artifacts {
            let rel = &a.destination[stage.dir.len() + 1..];
            let verb = match a.action {
                ArtifactAction::Fetch => c.green("+ fetch  "),
                ArtifactAction::Replace => c.yellow("~ replace"),
                ArtifactAction::Adopt => c.green("= adopt  "),
                ArtifactAction::Ok => c.dim("= ok     "),
            };
            let _ = writeln!(out, "  {verb} {rel:width$}  {}", a.reason);
            if matches!(a.action, ArtifactAction::Fetch | ArtifactAction::Replace)
                || a.state == crate::plan::ArtifactState::Unverified
            {
                let member = a
                    .member
                    .as_ref()
                    .map(|m| format!(" (member {m})"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {:9} {:width$}  {}",
                    "",
                    "",
                    c.dim(&format!("from {}{member}", a.url))
                );
            }
        }
    }

    out.push('\n');
    let link = match plan.current.action {
        LinkAction::Create => c.green("+ create -> genesis"),
        LinkAction::Ok => c.dim("= ok"),
        LinkAction::Attention => c.red("! attention"),
    };
    let _ = writeln!(
        out,
        "{} {link}  {}",
        c.bold("current:"),
        plan.current.reason
    );
    let pending = &plan.pending;
    let label = match (pending.state, &pending.name, pending.height) {
        (PendingState::Valid, Some(name), Some(height)) => format!("{name} at height {height}"),
        (PendingState::None, _, _) => "none".to_string(),
        (state, _, _) => format!("{state:?}").to_lowercase(),
    };
    let _ = writeln!(
        out,
        "{} {label}  {}",
        c.bold("pending upgrade:"),
        pending.reason
    );

    if !report.remote.is_empty() {
        let failed = report.remote.iter().filter(|r| !r.ok).count();
        let _ = writeln!(
            out,
            "\n{} {} artifacts downloaded and checked, {} ok, {failed} failed",
            c.bold("remote:"),
            report.remote.len(),
            report.remote.len() - failed
        );
        for r in &report.remote {
            let mark = if r.ok { c.green("ok  ") } else { c.red("FAIL") };
            let status = r.http_status.map(|s| format!("{s}, ")).unwrap_or_default();
            let size = r
                .size
                .map(|b| format!("{}, ", human_size(b)))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {mark} {}  {status}{size}{} ms  ({})",
                r.url,
                r.millis,
                r.used_by.join("; ")
            );
            if let Some(error) = &r.error {
                let _ = writeln!(
                    out,
                    "       {}",
                    c.red(error.lines().next().unwrap_or(error))
                );
            }
        }
    }

    if let Some(drift) = &report.drift {
        match drift.latest_height {
            Some(height) => {
                let scheduled = match &drift.current_plan {
                    Some(p) => format!("{} at height {}", p.name, p.height),
                    None => "no upgrade scheduled".into(),
                };
                let _ = writeln!(
                    out,
                    "\n{} {} ({}) at height {height}, {scheduled}",
                    c.bold("chain:"),
                    drift.node,
                    drift.chain_id
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "\n{} {} ({}): not this chain",
                    c.bold("chain:"),
                    drift.node,
                    drift.chain_id
                );
            }
        }
        if let Some(next) = &drift.next {
            let _ = writeln!(
                out,
                "  next: {} at height {}, {} blocks from now",
                next.name, next.height, next.blocks_remaining
            );
        }
        if drift.findings.is_empty() {
            let _ = writeln!(
                out,
                "  {}",
                c.green("no drift: the manifest agrees with the chain")
            );
        }
        // Each finding as a compiler would show it: where the manifest says it, then what.
        for f in &drift.findings {
            let label = match (f.severity, drift.trusted) {
                (crate::checks::drift::Severity::Error, _) => c.red("error:"),
                (crate::checks::drift::Severity::Warning, true) => c.yellow("stale:"),
                (crate::checks::drift::Severity::Warning, false) => c.yellow("warning:"),
            };
            let at = f
                .location
                .as_ref()
                .map(|l| format!("{l}: "))
                .unwrap_or_default();
            let upgrade = if f.upgrade.is_empty() {
                String::new()
            } else {
                format!("upgrade {}: ", f.upgrade)
            };
            let _ = writeln!(out, "  {label} {at}{upgrade}{}", f.message);
        }
    }

    if !plan.warnings.is_empty() || !report.runnable.is_empty() {
        out.push('\n');
        for w in &plan.warnings {
            let _ = writeln!(out, "{} {w}", c.yellow("warning:"));
        }
        // Will it run here (src/runnable.rs): one line per finding.
        for r in &report.runnable {
            for f in &r.findings {
                let _ = writeln!(
                    out,
                    "{} {} ({}): {}",
                    c.yellow("warning:"),
                    r.destination,
                    f.check,
                    f.message
                );
            }
        }
    }

    let s = plan.summary;
    let mut parts = vec![
        format!("{} to fetch", s.fetch),
        format!("{} to replace", s.replace),
    ];
    if s.adopt > 0 {
        parts.push(format!("{} to adopt", s.adopt));
    }
    parts.push(format!("{} ok", s.ok));
    if s.unmanaged > 0 {
        parts.push(format!("{} unmanaged", s.unmanaged));
    }
    if plan.current.action == LinkAction::Create {
        parts.push("current link to create".into());
    }
    // The verdict agrees with the exit code: a failed remote check or drift that breaks the node
    // fails the plan, whatever else it says.
    let mut failures = Vec::new();
    let remote_failed = report.remote.iter().filter(|r| !r.ok).count();
    if remote_failed > 0 {
        failures.push(format!(
            "{remote_failed} remote check{} failed",
            plural(remote_failed)
        ));
    }
    let drift_errors = report.drift.as_ref().map_or(0, |d| {
        d.findings
            .iter()
            .filter(|f| f.severity == crate::checks::drift::Severity::Error)
            .count()
    });
    if drift_errors > 0 {
        failures.push(format!(
            "{drift_errors} drift error{}",
            plural(drift_errors)
        ));
    }
    let verdict = if !failures.is_empty() {
        c.red(&format!("failed ({})", failures.join(", ")))
    } else if plan.has_changes() {
        c.yellow("changes pending")
    } else {
        c.green("nothing to do")
    };
    let _ = writeln!(
        out,
        "\n{} {}: {verdict}.",
        c.bold("Plan:"),
        parts.join(", ")
    );
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// What apply did (or would do, with --check), one line per action that matters.
pub fn apply_human(report: &Report, check: bool, c: Colors) -> String {
    let mut out = String::new();
    let (mut changed, mut unchanged, mut failed) = (0, 0, 0);
    for a in &report.actions {
        let what = if a.action == "link" {
            "current -> genesis".to_string()
        } else {
            a.destination.clone()
        };
        match a.status {
            Status::Unchanged => unchanged += 1,
            Status::Changed => {
                changed += 1;
                let mut detail = a.size.map(human_size).unwrap_or_default();
                if a.resumed {
                    detail.push_str(", resumed");
                }
                let detail = if detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({detail})")
                };
                let verb = match a.action {
                    "link" => c.green("+ created "),
                    "adopt" => c.green("= adopted "),
                    "replace" => c.yellow("~ replaced"),
                    _ => c.green("+ staged  "),
                };
                let _ = writeln!(out, "{verb} {what}{detail}");
                if a.action == "adopt" {
                    let _ = writeln!(
                        out,
                        "    {}",
                        c.dim("staged without a receipt, and proven to be what the manifest pins: receipt written, nothing replaced")
                    );
                }
                if let Some(r) = &a.replaced {
                    let was = r
                        .sha256
                        .as_ref()
                        .map(|sha| format!(" (sha256 {sha})"))
                        .unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "    {}",
                        c.dim(&format!(
                            "{}; the file it replaced{was} is kept at {}",
                            a.reason, r.kept_at
                        ))
                    );
                }
            }
            Status::WouldChange => {
                changed += 1;
                let _ = writeln!(
                    out,
                    "{} {what}  {}",
                    c.yellow(&format!("~ would {:7}", a.action)),
                    a.reason
                );
            }
            Status::Failed => {
                failed += 1;
                let pinned = match (&a.key, a.line) {
                    (Some(key), Some(line)) => format!(" (manifest line {line}, {key})"),
                    (Some(key), None) => format!(" ({key})"),
                    _ => String::new(),
                };
                let _ = writeln!(out, "{} {what}{pinned}", c.red("! failed   "));
                for line in a.error.as_deref().unwrap_or("unknown error").lines() {
                    let _ = writeln!(out, "    {line}");
                }
            }
        }
    }
    if let Some(error) = &report.error {
        for (i, line) in error.lines().enumerate() {
            let label = if i == 0 {
                c.red("! error: ")
            } else {
                "         ".to_string()
            };
            let _ = writeln!(out, "{label}{line}");
        }
    }
    let verdict = match (report.failed, report.changed, check) {
        (true, _, _) => c.red("failed"),
        (false, true, true) => c.yellow("changes pending"),
        (false, true, false) => c.green("changed"),
        (false, false, _) => c.green("nothing to do"),
    };
    let done = if check { "to change" } else { "changed" };
    let _ = writeln!(
        out,
        "{} {changed} {done}, {unchanged} unchanged, {failed} failed: {verdict}.",
        c.bold("Apply:")
    );
    out
}

/// What `cvx prune` removed (or would remove), and the stages it kept on purpose.
pub fn prune_human(p: &crate::apply::prune::Pruned, c: Colors) -> String {
    let mut out = String::new();
    let verb = if p.check {
        c.yellow("- would remove")
    } else {
        c.green("- removed")
    };
    for r in &p.removed {
        let _ = writeln!(
            out,
            "{verb} {}  {}",
            r.path,
            c.dim(&format!("{}, {}", r.reason, human_size(r.bytes)))
        );
    }
    for k in &p.kept {
        let _ = writeln!(out, "{} {}  {}", c.dim("= kept"), k.path, k.reason);
    }
    let done = if p.check { "to remove" } else { "removed" };
    let verdict = if p.removed.is_empty() {
        c.green("nothing to do")
    } else if p.check {
        c.yellow("changes pending")
    } else {
        c.green("changed")
    };
    let _ = writeln!(
        out,
        "{} {} {done} ({}), {} kept: {verdict}.",
        c.bold("Prune:"),
        p.removed.len(),
        human_size(p.bytes),
        p.kept.len()
    );
    out
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// `cvx status` for a person.
pub fn status_human(status: &crate::status::Status, c: Colors) -> String {
    let mut out = String::new();
    let home = status
        .home
        .as_ref()
        .map_or("unknown".to_string(), |h| h.display().to_string());
    let _ = writeln!(
        out,
        "{} {} ({}) on {}, home {home}",
        c.bold("chain"),
        status.chain,
        status.daemon,
        status.platform
    );
    let current = match (&status.current.upgrade, &status.current.stage) {
        (Some(name), Some(stage)) => {
            let version = status
                .current
                .version
                .as_ref()
                .map(|v| format!(" ({v})"))
                .unwrap_or_default();
            if stage == crate::tree::GENESIS {
                format!("genesis{version}")
            } else {
                format!("upgrade {name}{version} in {stage}")
            }
        }
        (None, Some(stage)) => format!("{stage} (not in the manifest)"),
        _ => "unknown: no current link (run cvx apply)".into(),
    };
    let _ = writeln!(out, "{}  {current}", c.bold("current:"));
    let next = match &status.next {
        Some(next) => {
            let at = next
                .height
                .map(|h| format!(" at height {h}"))
                .unwrap_or_default();
            let version = next
                .version
                .as_ref()
                .map(|v| format!(" ({v})"))
                .unwrap_or_default();
            let ready = if next.binary_ready {
                c.green(&next.reason)
            } else {
                c.yellow(&next.reason)
            };
            let scheduled = match (next.trigger, next.height) {
                (crate::manifest::Trigger::HaltHeight, Some(h)) => {
                    format!(", scheduled: cvx run halts the node at {h}")
                }
                _ => String::new(),
            };
            format!("upgrade {}{at}{version}{scheduled}: {ready}", next.name)
        }
        None => "none in the manifest".into(),
    };
    let _ = writeln!(out, "{}     {next}", c.bold("next:"));
    let pending = match (&status.pending.name, status.pending.height) {
        (Some(name), Some(h)) => format!("{name} at height {h}: {}", status.pending.reason),
        _ => status.pending.reason.clone(),
    };
    let _ = writeln!(out, "{}  {pending}", c.bold("pending:"));
    let node = &status.node;
    let line = match node.height {
        Some(h) => {
            let mut line = format!("height {h}");
            if let Some(ms) = node.block_time_ms {
                let _ = write!(line, ", {:.2}s per block", ms as f64 / 1000.0);
            }
            if let (Some(next), Some(left)) = (&status.next, node.blocks_remaining) {
                let _ = write!(line, ": {} in {left} blocks", next.name);
                if let Some(eta) = node.eta_seconds {
                    let _ = write!(
                        line,
                        ", about {}",
                        crate::time::human_duration(std::time::Duration::from_secs(eta))
                    );
                }
            }
            line
        }
        None => node.reason.clone(),
    };
    let _ = writeln!(out, "{}     {line}", c.bold("node:"));
    let _ = writeln!(
        out,
        "{} {}",
        c.bold("supervisor:"),
        supervisor_human(status.supervisor.as_ref(), c)
    );
    out
}

/// What the last `cvx run start` recorded, on one line.
fn supervisor_human(supervisor: Option<&crate::status::Supervisor>, c: Colors) -> String {
    use crate::status::UpgradeResult;
    let Some(s) = supervisor else {
        return "no `cvx run start` recorded on this home".into();
    };
    let mut line = if s.running {
        let daemon = if s.daemon_up {
            c.green("up")
        } else {
            c.yellow("down")
        };
        format!(
            "cvx run (pid {}) running, daemon {daemon}, {} restarts",
            s.pid, s.daemon_restarts
        )
    } else {
        format!("not running (last: cvx run, pid {})", s.pid)
    };
    let _ = write!(
        line,
        "; upgrades: {} succeeded, {} failed",
        s.upgrades.success, s.upgrades.failure
    );
    if let Some(last) = &s.last_upgrade {
        let outcome = match (last.result, &last.downtime_seconds, &last.error) {
            (UpgradeResult::Success, Some(down), _) => format!("succeeded, {down:.3} s down"),
            (UpgradeResult::Success, None, _) => "succeeded".into(),
            (UpgradeResult::Failure, _, error) => c.red(&format!(
                "failed: {}",
                error.as_deref().unwrap_or("unknown")
            )),
        };
        let _ = write!(
            line,
            "; last {} at height {}: {outcome}",
            last.name, last.height
        );
    }
    if let Some(b) = &s.last_backup {
        let _ = write!(
            line,
            "; last backup {:.3} s, {} copied",
            b.seconds,
            human_size(b.bytes_copied)
        );
    }
    for w in &s.warnings {
        let _ = write!(line, "\n  {} {}", c.yellow("warning:"), w.message);
    }
    line
}

pub use crate::errors::error_chain;

/// GitHub Actions workflow commands (`::error file=F,line=L,col=C,title=T::message`), one per
/// line: the runner turns each into an annotation on that line of the pull request. A third
/// renderer of the same values: manifest problems, and the plan's `--verify-remote` failures,
/// drift and will-it-run findings, each placed at the manifest key it carries.
pub mod github {
    use std::fmt::Write as _;
    use std::ops::Range;

    use toml::Spanned;
    use toml::de::{DeTable, DeValue};

    use crate::checks::PlanReport;
    use crate::checks::drift::Severity;
    use crate::manifest::Problem;
    use crate::plan::{KeyPart, ManifestKey};

    /// The manifest as written, to find the line of a key.
    pub struct Manifest<'s> {
        /// The path the annotations name: relative to the repository's root for GitHub to place
        /// them on the pull request's files.
        pub file: &'s str,
        source: &'s str,
        root: Option<Spanned<DeTable<'s>>>,
    }

    impl<'s> Manifest<'s> {
        pub fn new(file: &'s str, source: &'s str) -> Self {
            Manifest {
                file,
                source,
                root: DeTable::parse(source).ok(),
            }
        }

        /// 1-based line and column of `key`, or of the deepest part of it that is written.
        pub fn locate(&self, key: &ManifestKey) -> Option<(usize, usize)> {
            let root = self.root.as_ref()?;
            let mut found: Option<Range<usize>> = None;
            let mut value: Option<&Spanned<DeValue<'s>>> = None;
            for part in key.parts() {
                match part {
                    KeyPart::Key(name) => {
                        let table = match value.map(Spanned::get_ref) {
                            None => root.get_ref(),
                            Some(DeValue::Table(t)) => t,
                            Some(_) => break,
                        };
                        let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref() == name) else {
                            break;
                        };
                        found = Some(k.span());
                        value = Some(v);
                    }
                    KeyPart::Index(i) => {
                        let Some(DeValue::Array(items)) = value.map(Spanned::get_ref) else {
                            break;
                        };
                        let Some(item) = items.get(*i) else { break };
                        found = Some(item.span());
                        value = Some(item);
                    }
                }
            }
            let start = found?.start.min(self.source.len());
            let line_start = self.source[..start].rfind('\n').map_or(0, |i| i + 1);
            let line = self.source[..start].matches('\n').count() + 1;
            Some((line, self.source[line_start..start].chars().count() + 1))
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Level {
        Error,
        Warning,
    }

    /// One workflow command.
    fn command(
        out: &mut String,
        level: Level,
        file: &str,
        at: Option<(usize, usize)>,
        title: &str,
        message: &str,
    ) {
        let level = match level {
            Level::Error => "error",
            Level::Warning => "warning",
        };
        let _ = write!(out, "::{level} file={}", property(file));
        if let Some((line, col)) = at {
            let _ = write!(out, ",line={line},col={col}");
        }
        let _ = writeln!(out, ",title={}::{}", property(title), data(message));
    }

    /// A message: `%`, CR and LF escaped as the runner expects.
    fn data(text: &str) -> String {
        text.replace('%', "%25")
            .replace('\r', "%0D")
            .replace('\n', "%0A")
    }

    /// A property value: as a message, and `:` and `,` too.
    fn property(text: &str) -> String {
        data(text).replace(':', "%3A").replace(',', "%2C")
    }

    /// Manifest problems (validation errors or warnings), at their own line and column.
    pub fn problems(file: &str, problems: &[Problem], level: Level) -> String {
        let mut out = String::new();
        for p in problems {
            let title = if p.key.is_empty() {
                "cvx: manifest".to_string()
            } else {
                format!("cvx: {}", p.key)
            };
            let mut message = p.message.clone();
            if let Some(hint) = &p.hint {
                message.push_str("\nhint: ");
                message.push_str(hint);
            }
            command(
                &mut out,
                level,
                file,
                Some((p.line, p.column)),
                &title,
                &message,
            );
        }
        out
    }

    /// An error that left no plan (unusable tree, unreachable node, ...), on the manifest.
    pub fn error(file: &str, message: &str) -> String {
        let mut out = String::new();
        command(&mut out, Level::Error, file, None, "cvx plan", message);
        out
    }

    /// What the plan found that deserves a line of its own: pins the URL no longer serves
    /// (`--verify-remote`), drift from the chain (`--node`), binaries that will not run here.
    pub fn plan(manifest: &Manifest<'_>, report: &PlanReport) -> String {
        let mut out = String::new();
        let file = manifest.file;
        for r in report.remote.iter().filter(|r| !r.ok) {
            let error = r.error.as_deref().unwrap_or("failed");
            for (used_by, key) in r.used_by.iter().zip(&r.keys) {
                command(
                    &mut out,
                    Level::Error,
                    file,
                    manifest.locate(&key.key("url")),
                    "cvx plan --verify-remote",
                    &format!("{used_by}: {}: {error}", r.url),
                );
            }
        }
        if let Some(drift) = &report.drift {
            for f in &drift.findings {
                let (level, title) = match (f.severity, drift.trusted) {
                    (Severity::Error, _) => (Level::Error, "cvx plan --node: drift"),
                    (Severity::Warning, true) => (Level::Warning, "cvx plan --node: stale"),
                    (Severity::Warning, false) => {
                        (Level::Warning, "cvx plan --node: another chain")
                    }
                };
                let at = f.key.as_ref().and_then(|k| manifest.locate(k));
                command(
                    &mut out,
                    level,
                    file,
                    at,
                    title,
                    &if f.upgrade.is_empty() {
                        f.message.clone()
                    } else {
                        format!("upgrade {}: {}", f.upgrade, f.message)
                    },
                );
            }
        }
        for r in &report.runnable {
            for f in &r.findings {
                command(
                    &mut out,
                    Level::Warning,
                    file,
                    manifest.locate(&r.key),
                    &format!("cvx plan: will it run here ({})", f.check),
                    &format!("{}: {}", r.destination, f.message),
                );
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn messages_and_properties_are_escaped() {
            assert_eq!(data("50% done\r\nnext"), "50%25 done%0D%0Anext");
            assert_eq!(property("a:b,c%"), "a%3Ab%2Cc%25");
        }

        #[test]
        fn keys_are_found_where_they_are_written() {
            let source = "[chain]\nid = \"x\"\n\n[genesis]\nbinary.\"linux/amd64\" = { url = \"https://e.org/a\", sha256 = \"\" }\n\n[[upgrade]]\nname = \"v2\"\n\n[[upgrade]]\n  name = \"v3\"\n  height = 7\n  library.\"linux/amd64\" = [ { url = \"https://e.org/l\" }, { url = \"https://e.org/m\" } ]\n";
            let m = Manifest::new("cvx.toml", source);
            let at = |key: ManifestKey| m.locate(&key);
            let second = ManifestKey::stage(Some(1));
            assert_eq!(at(second.key("height")), Some((12, 3)));
            assert_eq!(at(second.key("name")), Some((11, 3)));
            assert_eq!(
                at(ManifestKey::stage(None)
                    .key("binary")
                    .key("linux/amd64")
                    .key("url")),
                Some((5, 26))
            );
            assert_eq!(
                at(second.key("library").key("linux/amd64").index(1).key("url")),
                Some((13, 60))
            );
            // Not written (the first upgrade has no height): the deepest part that is.
            assert_eq!(
                at(ManifestKey::stage(Some(0)).key("height")),
                at(ManifestKey::stage(Some(0)))
            );
            assert!(at(ManifestKey::stage(Some(0))).is_some());
            let no_upgrades = Manifest::new("cvx.toml", "[chain]\nid = \"x\"\n");
            assert_eq!(no_upgrades.locate(&ManifestKey::stage(Some(0))), None);
        }
    }
}
