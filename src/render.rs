//! Two renderers of one result value: for a person, and as one JSON document.

use std::fmt::Write as _;

use serde::Serialize;

use crate::apply::{Report, Status};
use crate::plan::{ArtifactAction, LinkAction, PendingState, Plan, StageAction};

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

/// One JSON document, pretty-printed, newline-terminated.
pub fn json<T: Serialize>(value: &T) -> String {
    let mut out = serde_json::to_string_pretty(value).expect("plain data always serializes");
    out.push('\n');
    out
}

/// The plan for a person: grouped by stage, one line per action with its reason.
pub fn plan_human(plan: &Plan, c: Colors) -> String {
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
                ArtifactAction::Ok => c.dim("= ok     "),
            };
            let _ = writeln!(out, "  {verb} {rel:width$}  {}", a.reason);
            if a.action != ArtifactAction::Ok {
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

    if !plan.remote.is_empty() {
        let failed = plan.remote.iter().filter(|r| !r.ok).count();
        let _ = writeln!(
            out,
            "\n{} {} artifacts downloaded and checked, {} ok, {failed} failed",
            c.bold("remote:"),
            plan.remote.len(),
            plan.remote.len() - failed
        );
        for r in &plan.remote {
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

    if let Some(drift) = &plan.drift {
        let scheduled = match &drift.current_plan {
            Some(p) => format!("{} at height {}", p.name, p.height),
            None => "no upgrade scheduled".into(),
        };
        let _ = writeln!(
            out,
            "\n{} {} at height {}, {scheduled}",
            c.bold("chain:"),
            drift.node,
            drift.latest_height
        );
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
        for f in &drift.findings {
            let label = match f.severity {
                crate::drift::Severity::Error => c.red("drift:"),
                crate::drift::Severity::Warning => c.yellow("stale:"),
            };
            let _ = writeln!(out, "  {label} {}: {}", f.upgrade, f.message);
        }
    }

    if !plan.warnings.is_empty() || !plan.runnable.is_empty() {
        out.push('\n');
        for w in &plan.warnings {
            let _ = writeln!(out, "{} {w}", c.yellow("warning:"));
        }
        // Will it run here (src/runnable.rs): one line per finding.
        for r in &plan.runnable {
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
        format!("{} ok", s.ok),
    ];
    if s.unmanaged > 0 {
        parts.push(format!("{} unmanaged", s.unmanaged));
    }
    if plan.current.action == LinkAction::Create {
        parts.push("current link to create".into());
    }
    let verdict = if plan.has_changes() {
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
                let verb = if a.action == "link" {
                    "created"
                } else {
                    "staged "
                };
                let _ = writeln!(out, "{} {what}{detail}", c.green(&format!("+ {verb}")));
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
                let _ = writeln!(out, "{} {what}", c.red("! failed "));
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
            format!("upgrade {}{at}{version}: {ready}", next.name)
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
    line
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
