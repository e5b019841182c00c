//! The command line: argument definitions, and one `run` per command wiring the stages together.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use std::sync::Arc;

use crate::apply::{self, ApplyError, fetch::FetchOptions};
use crate::checks::PlanReport;
use crate::manifest::{self, Loaded, ManifestError, Problem};
use crate::plan::{self, Plan, PlanInput};
use crate::render::{self, Colors};
use crate::tree::{self, InspectOptions, Layout, Tree, TreeError, lock};

/// Exit codes, the one table (README lists it too).
pub mod exit {
    /// Success; with `plan --detailed-exitcode`: nothing to do.
    pub const OK: u8 = 0;
    /// An error: invalid manifest, failed download, unusable tree, bad configuration.
    pub const ERROR: u8 = 1;
    /// `plan --detailed-exitcode` only: the manifest is valid and changes are pending.
    pub const CHANGES: u8 = 2;
}

#[derive(Debug, Parser)]
#[command(
    name = "cvx",
    version,
    about = "Declarative upgrades for Cosmos SDK nodes: plan, stage and supervise binaries in a Cosmovisor tree",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Rehearse the whole flow offline on a simulated chain: plan, apply, run through two upgrades.
    Demo {
        /// Keep the rehearsal's temp dir for inspection.
        #[arg(long)]
        keep: bool,
    },
    /// Validate the manifest and show what apply would change in the Cosmovisor tree.
    Plan(PlanArgs),
    /// Download, verify and atomically stage every binary the plan needs.
    Apply(ApplyArgs),
    /// Remove stages the manifest no longer names (never `current`'s) and old replaced files.
    Prune(PruneArgs),
    /// Where the node stands: current upgrade, the next one and its readiness, height and ETA.
    Status(StatusArgs),
    /// Supervise the node as `cosmovisor run` does: every argument goes to the daemon.
    #[command(
        disable_help_flag = true,
        after_help = crate::run::config::variables_help()
    )]
    Run(RunArgs),
    /// The backups of data/ that cvx run took before each upgrade.
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Every upgrade cvx run performed on this home: when, the downtime, the backup, the result.
    History(HomeArgs),
    /// Undo an upgrade: restore the backup taken before it and point current at the stage that
    /// ran before (the node must be stopped).
    Rollback(RollbackArgs),
    /// Print the JSON Schema of the manifest (or of plan's or status's JSON output).
    Schema(SchemaArgs),
    /// Write a manifest from another source of truth (the chain registry).
    Import {
        #[command(subcommand)]
        source: crate::author::import::ImportCommand,
    },
    /// Fill every empty sha256 in the manifest by downloading the artifact (trust on first use).
    Pin(crate::author::pin::PinArgs),
    /// Print a shell completion script, e.g. `cvx completions bash > /etc/bash_completion.d/cvx`.
    Completions { shell: clap_complete::Shell },
    /// The simulated node that `cvx demo` rehearses with (also the `simnode` binary).
    #[command(hide = true, disable_help_flag = true)]
    Simnode {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Print a man page (roff): `cvx man > cvx.1`, `cvx man plan > cvx-plan.1`.
    Man {
        /// A command's own page (cvx-plan, cvx-apply, ...) instead of cvx's.
        command: Option<String>,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum BackupCommand {
    /// Each backup, the upgrade it precedes, its bytes linked and copied, when, and whether it
    /// is intact.
    List(HomeArgs),
}

/// Options of the commands that work on a home without a manifest.
#[derive(Debug, Args)]
pub struct HomeArgs {
    /// The node's home.
    #[arg(long, env = "DAEMON_HOME", value_name = "DIR", required = true)]
    pub home: PathBuf,
    /// Print one JSON document on stdout instead of the human rendering.
    #[arg(long)]
    pub json: bool,
    /// More logs on stderr (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The upgrade to undo, as its plan is named.
    pub upgrade: String,
    #[command(flatten)]
    pub home: HomeArgs,
    /// Show what the rollback would do, and check that it can, without doing it.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The daemon's arguments, e.g. `start --home /var/lib/osmosis`; a first
    /// `--cosmovisor-config PATH` pair names a Cosmovisor config.toml instead.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<std::ffi::OsString>,
}

/// Options every command that reads a manifest takes.
#[derive(Debug, Args)]
pub struct Common {
    /// The manifest.
    #[arg(short = 'm', long, env = "CVX_MANIFEST", default_value = "cvx.toml")]
    pub manifest: PathBuf,
    /// The node's home; else DAEMON_HOME, else the manifest's chain.home.
    #[arg(long, env = "DAEMON_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Print one JSON document on stdout instead of the human rendering.
    #[arg(long)]
    pub json: bool,
    /// More logs on stderr (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub common: Common,
    /// Exit 0 when there is nothing to do, 2 when changes are pending, 1 on error.
    #[arg(long)]
    pub detailed_exitcode: bool,
    /// Re-hash every staged file instead of trusting receipts.
    #[arg(long)]
    pub verify: bool,
    /// Plan for this platform instead of the host's, e.g. linux/arm64.
    #[arg(long, value_name = "OS/ARCH")]
    pub platform: Option<String>,
    /// Download every artifact of every declared platform (writing nothing) and prove its sha256;
    /// exit 1 on any mismatch or unreachable URL. For CI.
    #[arg(long)]
    pub verify_remote: bool,
    /// A node's REST endpoint (e.g. http://127.0.0.1:1317): report drift between the manifest
    /// and the chain's scheduled and applied upgrades; exit 1 on drift that would break the node.
    #[arg(long, value_name = "URL")]
    pub node: Option<String>,
    /// Downloads at once for --verify-remote.
    #[arg(long, short = 'j', default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// Also run `<binary> version` for each staged, verified binary of this host whose version
    /// the manifest declares (environment cleared, HOME a temp dir), as apply does after staging.
    /// This executes files found in the tree: for hosts, never for CI. Without it, plan executes
    /// nothing.
    #[arg(long)]
    pub run_version: bool,
    /// Also write the findings (manifest problems, --verify-remote mismatches, --node drift,
    /// will-it-run) on stderr as a CI system's annotations: `github` for GitHub Actions workflow
    /// commands, shown on the manifest's lines in the pull request.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub annotations: Option<Annotations>,
}

/// CI systems whose annotation format plan can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Annotations {
    /// GitHub Actions workflow commands: `::error file=cvx.toml,line=12,col=1::message`.
    Github,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub common: Common,
    /// Artifacts downloaded at once.
    #[arg(long, short = 'j', default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// Show what would change, in apply's JSON shape, and write nothing (Ansible check mode).
    #[arg(long)]
    pub check: bool,
    /// Also replace files in the stage `current` points to (the binary a node may be running).
    #[arg(long)]
    pub force: bool,
    /// How long to wait for another apply on the same tree to finish (Go syntax: 30s, 5m).
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    pub lock_timeout: std::time::Duration,
    /// Re-hash every staged file instead of trusting receipts.
    #[arg(long)]
    pub verify: bool,
    /// Refuse artifacts larger than this many MiB, downloaded or unpacked (a decompression bomb).
    #[arg(long, default_value_t = 4096, value_name = "MIB")]
    pub max_size: u64,
    /// Attempts after a transient failure (connection, timeout, 5xx) of one download.
    #[arg(long, default_value_t = 4)]
    pub retries: u32,
    /// Fail (exit 1) when a binary of this host's platform now in place will not run here: not
    /// an executable, wrong architecture, missing libraries, too new a glibc, or `<binary>
    /// version` not printing the manifest's version. The files stay staged. Without it: warnings.
    #[arg(long)]
    pub strict: bool,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub common: Common,
    /// Show what would be removed, and remove nothing.
    #[arg(long)]
    pub check: bool,
    /// How long to wait for an apply or a switch on the same tree to finish (Go syntax: 30s, 5m).
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    pub lock_timeout: std::time::Duration,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    crate::duration::parse(text)
}

#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// Which schema.
    #[arg(value_enum, default_value = "manifest")]
    pub which: SchemaKind,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SchemaKind {
    /// The manifest, cvx.toml.
    Manifest,
    /// The JSON document `cvx plan --json` prints.
    Plan,
    /// The JSON document `cvx status --json` prints.
    Status,
}

impl Command {
    /// The log verbosity asked for: -1 quiet, 0 default, 1+ verbose.
    pub fn verbosity(&self) -> i8 {
        let (quiet, verbose) = match self {
            Command::Plan(PlanArgs { common, .. })
            | Command::Apply(ApplyArgs { common, .. })
            | Command::Prune(PruneArgs { common, .. })
            | Command::Status(StatusArgs { common }) => (common.quiet, common.verbose),
            Command::Backup {
                command: BackupCommand::List(home),
            }
            | Command::Rollback(RollbackArgs { home, .. }) => (home.quiet, home.verbose),
            Command::Pin(args) => (args.quiet, args.verbose),
            Command::Import {
                source: crate::author::import::ImportCommand::ChainRegistry(args),
            } => (args.quiet, args.verbose),
            _ => (false, 0),
        };
        if quiet { -1 } else { verbose as i8 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("platform {platform} is not among the manifest's platforms ({declared})")]
    Platform { platform: String, declared: String },
    #[error("{name}={value:?} is not a boolean")]
    EnvBool { name: &'static str, value: String },
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Run(Box<crate::run::RunError>),
    #[error("{0}")]
    Usage(String),
    #[error("the demo failed")]
    Demo(#[from] crate::demo::DemoError),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot write the man page to stdout")]
    ManPage(#[source] std::io::Error),
    #[error(transparent)]
    Import(#[from] crate::author::import::ImportError),
    #[error(transparent)]
    Pin(#[from] crate::author::pin::PinError),
    #[error(transparent)]
    Drift(#[from] crate::checks::drift::DriftError),
    #[error(transparent)]
    Rollback(#[from] crate::run::rollback::RollbackError),
    #[error("cannot read the upgrade history {}", path.display())]
    History {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<crate::run::RunError> for Error {
    fn from(e: crate::run::RunError) -> Self {
        // Boxed: the supervisor's errors carry digests and paths, and every Result would pay.
        Error::Run(Box::new(e))
    }
}

impl Error {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(exit::ERROR)
    }

    /// The obvious fix, when there is one.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::Manifest(ManifestError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::InvalidData =>
            {
                Some("a manifest is a UTF-8 TOML text file".into())
            }
            Error::Manifest(ManifestError::Read { path, .. }) => Some(format!(
                "pass the manifest with -m PATH or CVX_MANIFEST (looked for {})",
                path.display()
            )),
            Error::Manifest(ManifestError::Invalid { .. }) | Error::Tree(_) => None,
            Error::Platform { .. } => Some("pass --platform os/arch for one the manifest declares, or add this one to chain.platforms".into()),
            Error::EnvBool { .. } => Some("use true or false".into()),
            Error::Apply(ApplyError::NoHome) => Some("pass --home DIR, set DAEMON_HOME, or set chain.home in the manifest".into()),
            Error::Apply(ApplyError::Lock(lock::LockError::Locked { .. })) => Some("wait for the other cvx to finish, or raise --lock-timeout".into()),
            Error::Apply(_) => None,
            Error::Run(e) => e.hint(),
            Error::Usage(_) | Error::Runtime(_) | Error::ManPage(_) => None,
            Error::Drift(_) => Some("--node takes the node's REST endpoint (api.address in app.toml), e.g. http://127.0.0.1:1317".into()),
            Error::Demo(_) => Some("rerun with --keep to inspect the rehearsal's files".into()),
            Error::Import(e) => e.hint(),
            Error::Pin(e) => e.hint(),
            Error::Rollback(e) => e.hint(),
            Error::History { .. } => None,
        }
    }
}

/// Render an error for stderr: the message, its causes, the evidence and a hint.
pub fn report(err: &Error, colors: Colors) -> String {
    let mut out = String::new();
    if let Error::Manifest(ManifestError::Invalid {
        path,
        text,
        problems,
    }) = err
    {
        for p in problems {
            out.push_str(&problem_report(path, text, p, "error", colors));
        }
        out.push_str(&format!("{} {err}\n", colors.red("error:")));
        return out;
    }
    out.push_str(&format!("{} {err}\n", colors.red("error:")));
    let mut cause = std::error::Error::source(err);
    while let Some(c) = cause {
        out.push_str(&format!("  caused by: {c}\n"));
        cause = c.source();
    }
    if let Some(hint) = err.hint() {
        out.push_str(&format!("  {} {hint}\n", colors.bold("hint:")));
    }
    out
}

/// A manifest problem as a compiler would show it: location, message, the line, a caret, a hint.
pub fn problem_report(
    path: &Path,
    source: &str,
    p: &Problem,
    level: &str,
    colors: Colors,
) -> String {
    let label = if level == "error" {
        colors.red("error:")
    } else {
        colors.yellow("warning:")
    };
    let mut out = format!("{label} {}:{p}\n", path.display());
    if let Some(text) = source.lines().nth(p.line - 1) {
        let gutter = p.line.to_string().len();
        let width = source
            .get(p.span.clone())
            .map_or(1, |s| s.lines().next().unwrap_or("").chars().count().max(1));
        out.push_str(&format!("{:gutter$} |\n{} | {text}\n", "", p.line));
        out.push_str(&format!(
            "{:gutter$} | {:pad$}{}\n",
            "",
            "",
            "^".repeat(width),
            pad = p.column - 1
        ));
    }
    if let Some(hint) = &p.hint {
        out.push_str(&format!("  {} {hint}\n", colors.bold("hint:")));
    }
    out
}

/// `cvx run ARGS`: the supervisor, with the daemon's arguments as given.
pub fn run_supervisor(args: Vec<std::ffi::OsString>) -> Result<ExitCode, Error> {
    Ok(ExitCode::from(crate::run::main(args)?))
}

pub fn run(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Demo { keep } => {
            crate::demo::run(keep)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan(args) => run_plan(args),
        Command::Apply(args) => run_apply(args),
        Command::Prune(args) => run_prune(args),
        Command::Status(args) => run_status(args),
        Command::Backup {
            command: BackupCommand::List(args),
        } => run_backup_list(args),
        Command::Rollback(args) => run_rollback(args),
        Command::History(args) => run_history(args),
        Command::Run(args) => run_supervisor(args.args),
        Command::Import { source } => run_import(source),
        Command::Pin(args) => run_pin(args),
        Command::Schema(args) => {
            print!("{}", schema(args.which));
            Ok(ExitCode::SUCCESS)
        }
        Command::Simnode { args } => Ok(crate::demo::simnode::main(args)),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "cvx", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { command: name } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            if let Some(name) = name {
                let commands: Vec<String> = command
                    .get_subcommands()
                    .filter(|c| !c.is_hide_set())
                    .map(|c| c.get_name().to_string())
                    .collect();
                let sub = command.find_subcommand(&name).ok_or_else(|| {
                    Error::Usage(format!(
                        "no command `{name}`; try one of {}",
                        commands.join(", ")
                    ))
                })?;
                command = sub
                    .clone()
                    .name(format!("cvx-{name}"))
                    .version(env!("CARGO_PKG_VERSION"));
            }
            clap_mangen::Man::new(command)
                .render(&mut std::io::stdout())
                // A reader that stops early (`| head`) is not an error.
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(Error::ManPage)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The JSON Schema, as committed under `schemas/`.
pub fn schema(which: SchemaKind) -> String {
    match which {
        SchemaKind::Manifest => render::json(&schemars::schema_for!(manifest::Manifest)),
        SchemaKind::Plan => render::json(&schemars::schema_for!(PlanReport)),
        SchemaKind::Status => render::json(&schemars::schema_for!(crate::status::Status)),
    }
}

pub use crate::platform::host_platform;

/// A Cosmovisor-style boolean: true/false in any case, or empty for false.
pub fn env_bool(name: &'static str) -> Result<bool, Error> {
    match std::env::var(name) {
        Err(_) => Ok(false),
        Ok(v) if v.is_empty() || v.eq_ignore_ascii_case("false") => Ok(false),
        Ok(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Ok(value) => Err(Error::EnvBool { name, value }),
    }
}

/// The home in force: --home, else DAEMON_HOME (both through clap), else chain.home.
fn home(common: &Common, loaded: &Loaded) -> Option<PathBuf> {
    common
        .home
        .clone()
        .or_else(|| loaded.manifest.chain.home.clone())
}

/// Compute the plan: the tree under `home`, then the pure plan.
pub fn compute_plan(
    loaded: &Loaded,
    home: Option<PathBuf>,
    platform: Option<&str>,
    verify: bool,
) -> Result<Plan, Error> {
    let manifest = &loaded.manifest;
    let recase = !env_bool("COSMOVISOR_DISABLE_RECASE")?;
    let platform = platform.map_or_else(host_platform, str::to_string);
    let declared = manifest.platforms();
    if !declared.contains(&platform) {
        return Err(Error::Platform {
            platform,
            declared: declared.join(", "),
        });
    }
    let tree = match &home {
        Some(home) => tree::inspect(
            &Layout::new(home),
            &InspectOptions {
                verify,
                managed: plan::managed_dirs(manifest, recase),
            },
        )?,
        None => Tree::empty(None),
    };
    let warnings = loaded
        .warnings
        .iter()
        .map(|w| format!("{}:{w}", loaded.path.display()))
        .collect();
    let input = PlanInput {
        platform,
        recase,
        home,
        warnings,
    };
    Ok(plan::plan(manifest, &tree, &input))
}

fn run_plan(args: PlanArgs) -> Result<ExitCode, Error> {
    let result = plan_command(&args);
    if let Err(err) = &result {
        if args.annotations == Some(Annotations::Github) {
            eprint!("{}", error_annotations(&args.common.manifest, err));
        }
        // CI reading --json gets one document even when there is no plan: the error, and each
        // manifest problem with its line, column and key.
        if args.common.json {
            let problems = match err {
                Error::Manifest(ManifestError::Invalid { problems, .. }) => problems.clone(),
                _ => Vec::new(),
            };
            let document = serde_json::json!({
                "format_version": plan::FORMAT_VERSION,
                "manifest": args.common.manifest,
                "error": render::error_chain(err),
                "problems": problems,
            });
            print!("{}", render::json(&document));
        }
    }
    result
}

/// The manifest's path as GitHub places annotations: from the repository's root
/// (`GITHUB_WORKSPACE`) when it lies inside it, without a leading `./`.
fn annotation_file(path: &Path) -> String {
    let inside_workspace = std::env::var_os("GITHUB_WORKSPACE").and_then(|workspace| {
        std::path::absolute(path)
            .ok()?
            .strip_prefix(workspace)
            .ok()
            .map(Path::to_path_buf)
    });
    let path = inside_workspace.unwrap_or_else(|| path.to_path_buf());
    let relative: PathBuf = path
        .components()
        .filter(|c| *c != std::path::Component::CurDir)
        .collect();
    relative.display().to_string()
}

/// Why plan made no plan, as annotations: each manifest problem on its line, else the error.
fn error_annotations(manifest: &Path, err: &Error) -> String {
    let file = annotation_file(manifest);
    match err {
        Error::Manifest(ManifestError::Invalid { problems, .. }) => {
            render::github::problems(&file, problems, render::github::Level::Error)
        }
        _ => render::github::error(&file, &render::error_chain(err)),
    }
}

fn plan_command(args: &PlanArgs) -> Result<ExitCode, Error> {
    let loaded = manifest::load(&args.common.manifest)?;
    let home = home(&args.common, &loaded);
    let plan = compute_plan(&loaded, home, args.platform.as_deref(), args.verify)?;
    // Will it run here: staged, verified binaries of this host (src/runnable.rs); `version` is
    // executed only when asked.
    let execute = if args.run_version {
        crate::checks::runnable::Execute::Version
    } else {
        crate::checks::runnable::Execute::Nothing
    };
    let mut report = PlanReport::new(plan);
    report.runnable = crate::checks::runnable::check_plan(&report.plan, execute);
    if args.verify_remote {
        report.remote = runtime()?
            .block_on(crate::checks::remote::verify_remote(
                &loaded.manifest,
                usize::from(args.jobs),
                &FetchOptions::default(),
            ))
            .map_err(ApplyError::from)?;
    }
    if let Some(node) = &args.node {
        let mut drift = runtime()?.block_on(crate::checks::drift::check(&loaded.manifest, node))?;
        // Each finding at its line of the manifest, as validation errors are shown.
        let source = std::fs::read_to_string(&loaded.path).unwrap_or_default();
        let file = loaded.path.display().to_string();
        let manifest = render::github::Manifest::new(&file, &source);
        for finding in &mut drift.findings {
            finding.location = finding
                .key
                .as_ref()
                .and_then(|k| manifest.locate(k))
                .map(|(line, column)| format!("{file}:{line}:{column}"));
        }
        report.drift = Some(drift);
    }
    if args.common.json {
        print!("{}", render::json(&report));
    } else {
        print!("{}", render::plan_human(&report, Colors::for_stdout()));
    }
    if args.annotations == Some(Annotations::Github) {
        let file = annotation_file(&loaded.path);
        // The text as validated, to find each key's line; a file changed since only misplaces.
        let source = std::fs::read_to_string(&loaded.path).unwrap_or_default();
        let manifest = render::github::Manifest::new(&file, &source);
        eprint!(
            "{}{}",
            render::github::problems(&file, &loaded.warnings, render::github::Level::Warning),
            render::github::plan(&manifest, &report)
        );
    }
    let code = if report.remote.iter().any(|c| !c.ok)
        || report.drift.as_ref().is_some_and(|d| d.has_errors())
    {
        exit::ERROR
    } else if args.detailed_exitcode && report.plan.has_changes() {
        exit::CHANGES
    } else {
        exit::OK
    };
    Ok(ExitCode::from(code))
}

fn run_apply(args: ApplyArgs) -> Result<ExitCode, Error> {
    let report = match apply_report(&args) {
        Ok(report) => report,
        // Machines reading --json get one document even when apply could not start.
        Err(err) if args.common.json => {
            print!(
                "{}",
                render::json(&apply::Report::error(render::error_chain(&err)))
            );
            return Err(err);
        }
        Err(err) => return Err(err),
    };
    if args.common.json {
        print!("{}", render::json(&report));
    } else {
        print!(
            "{}",
            render::apply_human(&report, args.check, Colors::for_stdout())
        );
    }
    Ok(ExitCode::from(if report.failed {
        exit::ERROR
    } else {
        exit::OK
    }))
}

fn apply_report(args: &ApplyArgs) -> Result<apply::Report, Error> {
    let loaded = manifest::load(&args.common.manifest)?;
    let home = home(&args.common, &loaded).ok_or(ApplyError::NoHome)?;
    let layout = Layout::new(&home);
    if args.check {
        let plan = compute_plan(&loaded, Some(home), None, args.verify)?;
        let mut report = apply::check(&plan, args.force);
        locate_actions(&mut report, &loaded);
        return Ok(report);
    }
    // Plan under the lock: what another apply staged meanwhile is seen, not redone.
    let _lock =
        lock::lock(&layout, args.lock_timeout, lock::Role::Apply).map_err(ApplyError::from)?;
    let plan = compute_plan(&loaded, Some(home.clone()), None, args.verify)?;
    let options = apply::Options {
        jobs: usize::from(args.jobs),
        force: args.force,
        fetch: FetchOptions {
            max_size: args.max_size.saturating_mul(1 << 20),
            retries: args.retries,
            ..FetchOptions::default()
        },
    };
    let reporter: Arc<dyn apply::Reporter> = {
        use std::io::IsTerminal;
        if args.common.json || args.common.quiet || !std::io::stderr().is_terminal() {
            Arc::new(apply::Silent)
        } else {
            Arc::new(crate::apply::progress::Bars::new())
        }
    };
    let mut report = runtime()?.block_on(apply::execute(&plan, &layout, &options, reporter))?;
    // Will it run here: warnings, or with --strict a failure (src/runnable.rs).
    crate::checks::runnable::after_apply(&mut report, &plan, &layout, args.strict);
    locate_actions(&mut report, &loaded);
    Ok(report)
}

/// The manifest line of each action's artifact, so a failed download points at its pin.
fn locate_actions(report: &mut apply::Report, loaded: &Loaded) {
    // The text as validated; a file changed since only misplaces the lines.
    let source = std::fs::read_to_string(&loaded.path).unwrap_or_default();
    let file = loaded.path.display().to_string();
    let manifest = render::github::Manifest::new(&file, &source);
    for action in &mut report.actions {
        action.line = action
            .key
            .as_ref()
            .and_then(|k| manifest.locate(k))
            .map(|(line, _)| line);
    }
}

/// `cvx prune [--check]`: see [`crate::apply::prune`].
fn run_prune(args: PruneArgs) -> Result<ExitCode, Error> {
    let loaded = manifest::load(&args.common.manifest)?;
    let home = home(&args.common, &loaded).ok_or(ApplyError::NoHome)?;
    let layout = Layout::new(&home);
    let recase = !env_bool("COSMOVISOR_DISABLE_RECASE")?;
    let managed = plan::managed_dirs(&loaded.manifest, recase);
    let _lock = if args.check {
        None
    } else {
        Some(lock::lock(&layout, args.lock_timeout, lock::Role::Prune).map_err(ApplyError::from)?)
    };
    let pruned =
        apply::prune::prune(&layout, &managed, recase, args.check).map_err(ApplyError::from)?;
    if args.common.json {
        print!("{}", render::json(&pruned));
    } else {
        print!("{}", render::prune_human(&pruned, Colors::for_stdout()));
    }
    Ok(ExitCode::SUCCESS)
}

fn run_status(args: StatusArgs) -> Result<ExitCode, Error> {
    let loaded = manifest::load(&args.common.manifest)?;
    let home = home(&args.common, &loaded);
    let plan = compute_plan(&loaded, home.clone(), None, false)?;
    let node = runtime()?.block_on(crate::status::node(
        home.as_deref(),
        &loaded.manifest.chain.id,
    ));
    let mut status = crate::status::status(&plan, node);
    status.supervisor = home
        .as_deref()
        .and_then(|h| crate::status::supervisor(&Layout::new(h)));
    if args.common.json {
        print!("{}", render::json(&status));
    } else {
        print!("{}", render::status_human(&status, Colors::for_stdout()));
    }
    Ok(ExitCode::SUCCESS)
}

/// `cvx backup list`: see [`crate::run::rollback`].
fn run_backup_list(args: HomeArgs) -> Result<ExitCode, Error> {
    let backups = crate::run::rollback::list(&Layout::new(&args.home));
    if args.json {
        print!(
            "{}",
            render::json(&serde_json::json!({ "backups": backups }))
        );
    } else {
        print!("{}", render::backups_human(&backups, Colors::for_stdout()));
    }
    Ok(ExitCode::SUCCESS)
}

/// `cvx history`: see [`crate::run::history`].
fn run_history(args: HomeArgs) -> Result<ExitCode, Error> {
    let layout = Layout::new(&args.home);
    let entries = crate::run::history::read(&layout).map_err(|source| Error::History {
        path: layout.cvx().join("history.jsonl"),
        source,
    })?;
    if args.json {
        print!(
            "{}",
            render::json(&serde_json::json!({ "upgrades": entries }))
        );
    } else {
        print!("{}", render::history_human(&entries, Colors::for_stdout()));
    }
    Ok(ExitCode::SUCCESS)
}

/// `cvx rollback <upgrade> [--check]`: see [`crate::run::rollback`].
fn run_rollback(args: RollbackArgs) -> Result<ExitCode, Error> {
    use crate::run::rollback;
    let home = &args.home.home;
    let layout = Layout::new(home);
    let recase = !env_bool("COSMOVISOR_DISABLE_RECASE")?;
    let (record, plan) = rollback::prepare(home, &layout, &args.upgrade, recase)?;
    let result = if args.check {
        plan
    } else {
        runtime()?.block_on(rollback::execute(home, &layout, &record, plan))?
    };
    if args.home.json {
        print!("{}", render::json(&result));
    } else {
        print!("{}", render::rollback_human(&result, Colors::for_stdout()));
    }
    Ok(ExitCode::SUCCESS)
}

/// `cvx import chain-registry`: see [`crate::author::import`].
fn run_import(source: crate::author::import::ImportCommand) -> Result<ExitCode, Error> {
    crate::author::import::run(source)?;
    Ok(ExitCode::SUCCESS)
}

/// `cvx pin [--verify]`: see [`crate::author::pin`].
fn run_pin(args: crate::author::pin::PinArgs) -> Result<ExitCode, Error> {
    use crate::author::pin::PinError;
    match crate::author::pin::run(args) {
        Ok(true) => Ok(ExitCode::from(exit::OK)),
        Ok(false) => Ok(ExitCode::from(exit::ERROR)),
        // The manifest's own errors render as every other command's (problems, hints).
        Err(PinError::Manifest(e)) => Err(Error::Manifest(e)),
        Err(PinError::Runtime(e)) => Err(Error::Runtime(e)),
        Err(e) => Err(Error::Pin(e)),
    }
}

/// A runtime for the commands that do network I/O.
fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)
}
